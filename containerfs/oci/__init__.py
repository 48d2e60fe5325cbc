"""containerfs-oci: an OCI runtime (runc's command line) whose containers are containerfs
container objects. Contract: ../shared/spec/api.md section 14; docs/oci.md."""

VERSION = "0.1.0"
