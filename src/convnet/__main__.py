from convnet.cli import main

main()
