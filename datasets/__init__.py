from datasets.omniglot import (DataNotFoundError, Omniglot, find_root, load_split, sample_meta_test,
                               sample_meta_train)

__all__ = ["DataNotFoundError", "Omniglot", "find_root", "load_split", "sample_meta_test", "sample_meta_train"]
