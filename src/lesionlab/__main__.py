from lesionlab.cli import main

main()
