"""Data: QwenLong-L1 prompt template (template), DocQA loaders and length binning (docqa), synthetic long-document
QA (synthetic), the tiny preset's locally trained tokenizer (tokenizer)."""
