from datasets.omniglot import (Omniglot, find_root, load_split, sample_meta_test, sample_meta_train)

__all__ = ["Omniglot", "find_root", "load_split", "sample_meta_test", "sample_meta_train"]
