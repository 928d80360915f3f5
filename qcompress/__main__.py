from qcompress.cli import main

main()
