from nibblora.memory.cli import main

raise SystemExit(main())
