"""containerfs: the service that plays the kernel's part of the container system calls."""
