"""Identity methods: the session's identity record (``session``), the IP-Adapter variants (``adapters``),
InstantID's IdentityNet (``instantid``) and pose keypoints (``pose``)."""
