from nibblora.verify.check import main

raise SystemExit(main())
