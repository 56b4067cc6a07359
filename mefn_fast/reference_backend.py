"""The "reference" backend: :mod:`mefn_fast.reference`, always available."""
from .reference import xattn_similarity_reference


def load():
    return xattn_similarity_reference
