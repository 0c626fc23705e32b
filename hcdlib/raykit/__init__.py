"""Ray: starting or joining a cluster, sizing work from its resources, the Ray Data read stage."""
