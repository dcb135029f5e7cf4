"""Jobs that write stores: producers (CONTRACTS C1) and what drives them."""
