"""The logged retriever, as an MLflow model from code: MLflow runs this file on load (nothing is
pickled); its settings come from the model's ``model_config`` and its bundle from its artifacts."""

from mlflow.models import set_model

from learn.serve.retriever import Retriever

set_model(Retriever())
