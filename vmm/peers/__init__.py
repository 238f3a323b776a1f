"""Clients of the services a VM manager talks to: the KMS."""
