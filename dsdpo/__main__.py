from dsdpo.cli import main

main()
