"""neuronreg's lm-evaluation-harness task configs (FLORES-200 translation, SIB-200), found through
lm-eval's include path. lm-eval reads these files by their path; nothing here imports neuronreg."""
