"""Model adapters: each drives our decode loop on our cache engine for one model family."""
