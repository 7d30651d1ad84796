# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_grace_global_optspecs
    string join \n h/help V/version
end

function __fish_grace_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_grace_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_grace_using_subcommand
    set -l cmd (__fish_grace_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c grace -n "__fish_grace_needs_command" -s h -l help -d 'Print help'
complete -c grace -n "__fish_grace_needs_command" -s V -l version -d 'Print version'
complete -c grace -n "__fish_grace_needs_command" -f -a "run" -d 'Bind the sockets and run COMMAND on them, restarting it in place on SIGUSR2'
complete -c grace -n "__fish_grace_needs_command" -f -a "restart" -d 'Restart the running grace and wait for the outcome: exit 0 once the new generation serves, 1 with the reason when it was rolled back'
complete -c grace -n "__fish_grace_needs_command" -f -a "status" -d 'Show the running grace\'s generations, PIDs, states, listen addresses and last restart'
complete -c grace -n "__fish_grace_needs_command" -f -a "stop" -d 'Stop the running grace gracefully and wait until it has exited'
complete -c grace -n "__fish_grace_needs_command" -f -a "completions" -d 'Print a shell completion script (bash, zsh, fish, elvish, powershell) or the man page (man)'
complete -c grace -n "__fish_grace_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c grace -n "__fish_grace_using_subcommand run" -s l -l listen -d 'A socket to bind and pass to the server, [NAME=]ADDR: `:8080`, `127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`, `tcp4://…`, `tcp6://…`, `udp://:5353`, `unix:/run/app.sock`, `unix:@abstract`, `fd:N`, `systemd`. Repeatable; the server gets them at fds 3, 4, … in this order' -r
complete -c grace -n "__fish_grace_using_subcommand run" -l ready -d 'When a new generation counts as ready: auto, notify, delay:DURATION, http:PATH, tcp or exec:COMMAND' -r
complete -c grace -n "__fish_grace_using_subcommand run" -l ready-timeout -d 'Roll a new generation back if it is not ready within this time' -r
complete -c grace -n "__fish_grace_using_subcommand run" -l stop-signal -d 'The signal that asks a generation to drain and exit (TERM, SIGQUIT, 15, …)' -r
complete -c grace -n "__fish_grace_using_subcommand run" -l drain-timeout -d 'How long a draining generation may take before its whole process group gets SIGKILL' -r
complete -c grace -n "__fish_grace_using_subcommand run" -l idle-wait -d 'After traffic moved to a new generation, wait up to this long for the old one to close the connections it accepted before sending it the stop signal (0: do not wait)' -r
complete -c grace -n "__fish_grace_using_subcommand run" -l on-crash -d 'What to do when the current generation dies on its own' -r -f -a "restart\t'Start a new generation on the same sockets (clients wait in the queue), with a capped backoff; give up after repeated crashes'
exit\t'Stop and exit with the generation\'s status'"
complete -c grace -n "__fish_grace_using_subcommand run" -l max-draining -d 'At most this many generations draining at once; the oldest is killed first' -r
complete -c grace -n "__fish_grace_using_subcommand run" -l pid-file -d 'Write grace\'s PID here (atomically); removed on exit' -r -F
complete -c grace -n "__fish_grace_using_subcommand run" -l control -d 'Also accept restart/status/stop requests on this Unix socket (mode 0600, same user or root)' -r -F
complete -c grace -n "__fish_grace_using_subcommand run" -l status-file -d 'Keep this file up to date with the status as JSON (rewritten atomically on every change)' -r -F
complete -c grace -n "__fish_grace_using_subcommand run" -l compat -d 'Also set the environment another tool\'s servers expect (repeatable)' -r -f -a "server-starter\t'`SERVER_STARTER_PORT` (`addr=fd;…`) and `SERVER_STARTER_GENERATION`, as start_server sets them'
einhorn\t'`EINHORN_FD_COUNT` and `EINHORN_FD_<i>`, as einhorn sets them'"
complete -c grace -n "__fish_grace_using_subcommand run" -l backlog -d 'Listen backlog [default: the system\'s somaxconn]' -r
complete -c grace -n "__fish_grace_using_subcommand run" -l socket-mode -d 'File mode for unix socket files, in octal (e.g. 660)' -r
complete -c grace -n "__fish_grace_using_subcommand run" -l inject -d 'For servers that bind their own port: a seccomp filter in every generation hands a server that binds a --listen address its generation\'s socket instead, whatever the binary (Go, static, musl); nothing is added to its environment. Where grace lacks CAP_SYS_ADMIN (a user other than root, or root in a container) the server runs with no_new_privs, which the kernel then requires for the filter. Needs Linux 5.9: `auto` says so and runs without it on older kernels, `always` refuses to start' -r -f -a "auto\t'For every command, where the kernel can (Linux 5.9+); before that, grace says so and runs without'
always\t'For every command; on a kernel before 5.9 grace refuses to start'
never\t'Never: the server gets the sockets by socket activation only'"
complete -c grace -n "__fish_grace_using_subcommand run" -l no-listen-pid -d 'Do not set LISTEN_PID (for servers started through a wrapper that does not `exec`)'
complete -c grace -n "__fish_grace_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c grace -n "__fish_grace_using_subcommand restart" -l control -d 'The control socket that `grace run --control PATH` created' -r -F
complete -c grace -n "__fish_grace_using_subcommand restart" -l pid-file -d 'The pid file that `grace run --pid-file PATH` wrote' -r -F
complete -c grace -n "__fish_grace_using_subcommand restart" -l timeout -d 'Give up waiting for the answer after this long' -r
complete -c grace -n "__fish_grace_using_subcommand restart" -s h -l help -d 'Print help'
complete -c grace -n "__fish_grace_using_subcommand status" -l control -d 'The control socket that `grace run --control PATH` created' -r -F
complete -c grace -n "__fish_grace_using_subcommand status" -l pid-file -d 'The pid file that `grace run --pid-file PATH` wrote' -r -F
complete -c grace -n "__fish_grace_using_subcommand status" -l timeout -d 'Give up waiting for the answer after this long' -r
complete -c grace -n "__fish_grace_using_subcommand status" -l json -d 'Print the status as JSON (the same object as `--status-file`)'
complete -c grace -n "__fish_grace_using_subcommand status" -s h -l help -d 'Print help'
complete -c grace -n "__fish_grace_using_subcommand stop" -l control -d 'The control socket that `grace run --control PATH` created' -r -F
complete -c grace -n "__fish_grace_using_subcommand stop" -l pid-file -d 'The pid file that `grace run --pid-file PATH` wrote' -r -F
complete -c grace -n "__fish_grace_using_subcommand stop" -l timeout -d 'Give up waiting for the answer after this long' -r
complete -c grace -n "__fish_grace_using_subcommand stop" -s h -l help -d 'Print help'
complete -c grace -n "__fish_grace_using_subcommand completions" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c grace -n "__fish_grace_using_subcommand help; and not __fish_seen_subcommand_from run restart status stop completions help" -f -a "run" -d 'Bind the sockets and run COMMAND on them, restarting it in place on SIGUSR2'
complete -c grace -n "__fish_grace_using_subcommand help; and not __fish_seen_subcommand_from run restart status stop completions help" -f -a "restart" -d 'Restart the running grace and wait for the outcome: exit 0 once the new generation serves, 1 with the reason when it was rolled back'
complete -c grace -n "__fish_grace_using_subcommand help; and not __fish_seen_subcommand_from run restart status stop completions help" -f -a "status" -d 'Show the running grace\'s generations, PIDs, states, listen addresses and last restart'
complete -c grace -n "__fish_grace_using_subcommand help; and not __fish_seen_subcommand_from run restart status stop completions help" -f -a "stop" -d 'Stop the running grace gracefully and wait until it has exited'
complete -c grace -n "__fish_grace_using_subcommand help; and not __fish_seen_subcommand_from run restart status stop completions help" -f -a "completions" -d 'Print a shell completion script (bash, zsh, fish, elvish, powershell) or the man page (man)'
complete -c grace -n "__fish_grace_using_subcommand help; and not __fish_seen_subcommand_from run restart status stop completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
