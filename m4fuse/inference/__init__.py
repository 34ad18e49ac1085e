"""Prediction with a trained model and the pictures of it."""
