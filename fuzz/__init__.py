"""Long fuzz campaigns over the readers of untrusted files (`make fuzz`; not part of `make test`)."""
