"""Grading answers: extraction and comparison, and the safe arithmetic of calculator annotations."""
