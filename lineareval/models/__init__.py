"""Model families: generators (GPTs) and image tokenizers, with official checkpoint layouts."""
