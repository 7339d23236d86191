"""Deployment: the container image, Kubernetes manifests, installing the package, ./run's bootstrap."""
