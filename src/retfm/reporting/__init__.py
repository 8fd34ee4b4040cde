"""Figures, the study report (HTML + Markdown) and the terminal summary."""
