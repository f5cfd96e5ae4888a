from robbench.cli import main

main()
