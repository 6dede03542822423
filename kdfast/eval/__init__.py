"""Evaluation of digit samples: a shipped CNN classifier, a Frechet distance in its features, class accuracy."""
from .classifier import (SHIPPED_PATH, ClassifierAssetError, DigitsClassifier, load_classifier, save_classifier,
                         train_classifier)
from .metrics import DigitsEvaluator, class_accuracy, frechet_distance

__all__ = ["SHIPPED_PATH", "ClassifierAssetError", "DigitsClassifier", "DigitsEvaluator", "class_accuracy",
           "frechet_distance", "load_classifier", "save_classifier", "train_classifier"]
