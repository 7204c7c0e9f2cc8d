from speedtune.cli import main

main()
