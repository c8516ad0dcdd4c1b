"""``hive completion bash|zsh|fish``: completion scripts written from the parser itself, so that
every command, alias and flag (and the choices of ``--state``, ``-o``...) completes as it is."""

from __future__ import annotations

import argparse
import shlex


def _tree(parser: argparse.ArgumentParser) -> dict[str, tuple[list[str], list[str]]]:
    """``{"list": (flags, subcommands), "fleet apply": (...), "": (top flags, commands)}``."""
    out: dict[str, tuple[list[str], list[str]]] = {}

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        flags = [o for a in p._actions for o in a.option_strings if a.help != argparse.SUPPRESS]
        subs: list[str] = [  # a positional's fixed values (hive completion bash|zsh|fish)
            str(c)
            for a in p._actions
            if not a.option_strings and a.choices and not isinstance(a, argparse._SubParsersAction)
            for c in a.choices
        ]
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    subs.append(name)
                    walk(child, f"{path} {name}".strip())
        out[path] = (flags, subs)

    walk(parser, "")
    return out


def _choices(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Flags with a fixed set of values, across every command: ``{"--state": [...]}``."""
    found: dict[str, list[str]] = {}

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in dict.fromkeys(action.choices.values()):
                    walk(child)
            elif action.choices and action.option_strings:
                for option in action.option_strings:
                    found[option] = [str(c) for c in action.choices]

    walk(parser)
    return found


def bash(parser: argparse.ArgumentParser) -> str:
    tree, choices = _tree(parser), _choices(parser)
    cases = "\n".join(
        f"        {shlex.quote(path)}) words={shlex.quote(' '.join(subs + flags))} ;;"
        for path, (flags, subs) in tree.items()
    )
    values = "\n".join(
        f'        {option}) COMPREPLY=($(compgen -W {shlex.quote(" ".join(vals))} -- "$cur"));'
        " return ;;"
        for option, vals in choices.items()
    )
    return f"""# hive completion for bash: source <(hive completion bash)
_hive() {{
    local cur prev path="" word i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    case "$prev" in
{values}
    esac
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        [[ "$word" == -* ]] && continue
        case "${{path:+$path }}$word" in
{chr(10).join(f"            {shlex.quote(p)}) path={shlex.quote(p)} ;;" for p in tree if p)}
        esac
    done
    local words
    case "$path" in
{cases}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _hive hive"""


def zsh(parser: argparse.ArgumentParser) -> str:
    """bash's script under zsh's bashcompinit: one source of truth for both."""
    return (
        '#compdef hive\n# hive completion for zsh: hive completion zsh > "${fpath[1]}/_hive"\n'
        "autoload -U +X bashcompinit && bashcompinit\n" + bash(parser).split("\n", 1)[1]
    )


def fish(parser: argparse.ArgumentParser) -> str:
    tree, choices = _tree(parser), _choices(parser)
    lines = [
        "# hive completion for fish: hive completion fish > ~/.config/fish/completions/hive.fish"
    ]
    lines.append("complete -c hive -f")
    for path, (flags, subs) in tree.items():
        if path:
            words = path.split()
            condition = " && ".join(f"__fish_seen_subcommand_from {w}" for w in words)
        else:
            condition = "__fish_use_subcommand"
        for sub in subs:
            lines.append(f"complete -c hive -n {shlex.quote(condition)} -a {shlex.quote(sub)}")
        for flag in flags:
            if flag.startswith("--"):
                spec = f"-l {flag[2:]}"
            elif len(flag) == 2:
                spec = f"-s {flag[1]}"
            else:
                continue
            values = choices.get(flag)
            extra = f" -x -a {shlex.quote(' '.join(values))}" if values else ""
            lines.append(f"complete -c hive -n {shlex.quote(condition)} {spec}{extra}")
    return "\n".join(lines)


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    return {"bash": bash, "zsh": zsh, "fish": fish}[shell](parser)
