"""Item text: readers for the datasets that have it, encoders with an on-disk cache, and the
cross-domain pre-training / fine-tuning commands built on text-based item representations."""
