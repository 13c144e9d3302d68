from kubechain.cli import main

main()
