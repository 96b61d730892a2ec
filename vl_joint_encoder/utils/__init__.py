"""Utilities shared by every layer of the package (atomic files, JSON, hashing); they import nothing of the package."""
