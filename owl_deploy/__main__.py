from owl_deploy.cli import main

main()
