from stitchnet_tf_cli.main import main

main()
