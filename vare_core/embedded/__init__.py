"""The embedded "shapes world" default model: world renderer, classifier, training."""
