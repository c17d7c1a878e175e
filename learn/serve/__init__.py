"""Serving: the bundle-backed retriever as an MLflow pyfunc model."""

from learn.serve.retriever import Retriever, load_retriever, log_retriever, retriever_signature

__all__ = ["Retriever", "load_retriever", "log_retriever", "retriever_signature"]
