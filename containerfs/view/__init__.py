"""The /containers view: a FUSE filesystem the service mounts (docs/view.md).

`model` holds everything the view shows and decides, without FUSE; `fuse` serves it with pyfuse3.
"""
