"""The `stitchnet-tf` command line (installed as the `stitchnet_tf_cli` package)."""
