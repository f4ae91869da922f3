"""m6rec: pretraining generative language models as open-ended recommender systems."""

__version__ = "0.1.0"
