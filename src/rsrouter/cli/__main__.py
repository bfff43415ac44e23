from rsrouter.cli.main import main

main()
