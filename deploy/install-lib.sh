# Shared by deploy/systemd/install.sh and deploy/launchd/install.sh, which source it (POSIX sh) after setting
# PREFIX and SRC. Functions:
#   parse_args "$@"             ASSETS_SRC, IFER, WITHOUT_IFER and VENV from the command line, checked
#   install_venv                VENV: the one given, or $PREFIX/venv with the project pip-installed into it
#   provision_models            verified model files (and the IFER export) into $PREFIX/assets
#   write_config FILE MODE [G]  a new agent.toml (mode MODE, group G) from the example, naming the IFER export
#                               when one is installed; an existing file is kept (with a warning if it names none)

usage() {
    echo "usage: install.sh --assets DIR (--ifer EXPORT | --without-ifer) [--venv DIR]" >&2
    exit 2
}

parse_args() {
    ASSETS_SRC=""
    IFER=""
    WITHOUT_IFER=0
    VENV=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --assets) [ $# -ge 2 ] || usage; ASSETS_SRC="$2"; shift 2 ;;
            --ifer) [ $# -ge 2 ] || usage; IFER="$2"; shift 2 ;;
            --without-ifer) WITHOUT_IFER=1; shift ;;
            --venv) [ $# -ge 2 ] || usage; VENV="$2"; shift 2 ;;
            *) usage ;;
        esac
    done
    if [ -n "$IFER" ] && [ "$WITHOUT_IFER" = 1 ]; then
        usage
    fi
    if [ -z "$ASSETS_SRC" ] && [ ! -d "$PREFIX/assets/models" ]; then
        echo "install.sh: the first install needs --assets DIR (the model files) and --ifer EXPORT or --without-ifer" >&2
        exit 2
    fi
    if [ -n "$ASSETS_SRC" ] && [ -z "$IFER" ] && [ "$WITHOUT_IFER" = 0 ]; then
        echo "install.sh: give --ifer EXPORT (a trained IFER head, from fedfer-agent train-ifer) or --without-ifer" >&2
        exit 2
    fi
}

install_venv() {
    if [ -n "$VENV" ]; then
        if [ ! -x "$VENV/bin/fedfer-agent" ]; then
            echo "install.sh: $VENV has no fedfer-agent (install the project into it first)" >&2
            exit 1
        fi
        return
    fi
    VENV="$PREFIX/venv"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet --upgrade "$SRC[agent]"
}

provision_models() {
    if [ -z "$ASSETS_SRC" ]; then
        "$VENV/bin/fedfer-agent" provision --to "$PREFIX/assets" --check
    elif [ -n "$IFER" ]; then
        "$VENV/bin/fedfer-agent" provision --to "$PREFIX/assets" --from "$ASSETS_SRC" --ifer "$IFER"
    else
        "$VENV/bin/fedfer-agent" provision --to "$PREFIX/assets" --from "$ASSETS_SRC" --without-ifer
    fi
}

write_config() {
    config="$1"
    if [ ! -e "$config" ]; then
        # Every key with its secure default, documented; the operator sets [capture] and [federation].
        if [ -d "$PREFIX/assets/models/ifer" ]; then
            sed 's#^ifer_model = ""  #ifer_model = "models/ifer"#' "$SRC/deploy/agent.example.toml" > "$config.tmp"
        else
            cp "$SRC/deploy/agent.example.toml" "$config.tmp"
        fi
        chmod "$2" "$config.tmp"
        if [ $# -ge 3 ]; then
            chgrp "$3" "$config.tmp"
        fi
        mv "$config.tmp" "$config"
    elif [ -d "$PREFIX/assets/models/ifer" ] && grep -q '^ifer_model = ""' "$config"; then
        echo "install.sh: warning: $config has no vision.ifer_model; set ifer_model = \"models/ifer\"" >&2
    fi
}
