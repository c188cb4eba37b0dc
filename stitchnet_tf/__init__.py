"""StitchNet (Zammit et al., BMC Bioinformatics 2022) for COVID-19 lung CT in Keras 3."""

__version__ = "0.1.0"
