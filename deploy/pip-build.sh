#!/bin/sh
# pip as the Dockerfile's build stages run it (installed there as /usr/local/bin/pip-build; not in the runtime
# images):
#
#   pip-build --configure                        once, in the venv stage: write the build args PIP_INDEX_URL,
#                                                PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST into /etc/pip.conf (pip's
#                                                site-wide file), so every later pip step uses the same index
#   pip-build has-version INDEX NAME VERSION     exit 0 when INDEX offers NAME==VERSION for this platform
#   pip-build ARGS...                            pip ARGS, with the build secrets when given:
#                                                  pip.conf (read after /etc/pip.conf: its settings win)
#                                                  ca.pem   (the CA bundle pip verifies TLS against)
set -eu

# The build args reach the venv stage's RUN as variables, empty when not given: to pip, empty means "no index".
for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
    eval "[ -n \"\${$name:-}\" ] || unset $name"
done
[ -f /run/secrets/pip.conf ] && export PIP_CONFIG_FILE=/run/secrets/pip.conf
[ -f /run/secrets/ca.pem ] && export PIP_CERT=/run/secrets/ca.pem

case "${1:-}" in
    --configure)
        {
            echo "[global]"
            [ -z "${PIP_INDEX_URL:-}" ] || echo "index-url = $PIP_INDEX_URL"
            [ -z "${PIP_EXTRA_INDEX_URL:-}" ] || echo "extra-index-url = $PIP_EXTRA_INDEX_URL"
            [ -z "${PIP_TRUSTED_HOST:-}" ] || echo "trusted-host = $PIP_TRUSTED_HOST"
        } >/etc/pip.conf
        exit 0 ;;
    has-version)
        index=$2 name=$3 version=$4
        # One quick look at the index (no retries), not a download: a missing wheel is reported in seconds.
        pip index versions "$name" --index-url "$index" --retries 0 --timeout 30 \
            | sed -n 's/^Available versions: //p' | tr -d ' ' | tr ',' '\n' | grep -qxF "$version"
        exit ;;
esac
exec pip "$@"
