"""Routing: rules that decide what happens to stored instances, the durable outbox, the forwarding workers."""
