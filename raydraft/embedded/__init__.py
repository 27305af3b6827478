"""The embedded default: the shapes world's pretrained model and reward, and their scripts."""
