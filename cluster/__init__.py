"""AFD runtime: attention workers and FFN workers as Ray actors, joined per layer by a point-to-point transport."""
