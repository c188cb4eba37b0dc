"""The trained models shipped with stitchnet-tf (installed as `stitchnet_tf_models`).

One folder per model, each with a `MODEL_CARD.md`; names and files: `stitchnet_tf.shipped`.
"""
