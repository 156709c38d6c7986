"""Everything the fleet keeps in Redis: key names, the event stream, task records, the registry."""
