"""Packaging; the native part (engine._C, libqaengine) is built by the CMake project in CMakeLists.txt."""

from setuptools import setup

setup()
