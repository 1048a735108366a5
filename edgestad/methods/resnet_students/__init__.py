"""The ResNet-18-teacher / CNN-students study on the Method interface. See method.py."""
from .method import ResNetStudents, ResNetStudentsConfig, ResNetStudentsMethod  # noqa: F401
