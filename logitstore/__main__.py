from .entry import logitstore

logitstore()
