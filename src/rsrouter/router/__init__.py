"""Router training: radius tables, the router model, its training and expert finetuning."""
