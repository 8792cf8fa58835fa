# Least privilege for credbroker on the KV v2 mount "secret", prefix "credbroker"
# (the defaults; change both path prefixes together with --vault-mount/--vault-prefix).
#
#   vault policy write credbroker deploy/vault/credbroker.hcl

# Image hosts, registry claims and the default pointer: read, create and
# compare-and-set writes. No "delete" on data/: deletes go through delete/.
path "secret/data/credbroker/*" {
  capabilities = ["create", "read", "update"]
}

# Versions for check-and-set, and listing hosts.
path "secret/metadata/credbroker/*" {
  capabilities = ["read", "list"]
}

# Listing the whole prefix (credbroker store migrate).
path "secret/metadata/credbroker" {
  capabilities = ["list"]
}

# Soft delete of one version (keeps the version counter, so etags never repeat).
path "secret/delete/credbroker/*" {
  capabilities = ["update"]
}

# Token lifecycle (also in Vault's default policy).
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
