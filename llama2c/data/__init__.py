"""Data tooling: tokenizer training, story files -> uint16 token shards, and the
TinyStories download / train_vocab / pretokenize pipeline.

Needs sentencepiece and tqdm (the ``train`` extra); never imports torch.
"""
from .shards import load_meta, load_split, prepare
from .stories import (HFDataset, expand_inputs, is_validation, iter_file_stories, iter_stories,
                      read_stories, split_text)
from .tokenizer_train import train_tokenizer

__all__ = ["HFDataset", "expand_inputs", "is_validation", "iter_file_stories", "iter_stories", "load_meta",
           "load_split", "prepare", "read_stories", "split_text", "train_tokenizer"]
